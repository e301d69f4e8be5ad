// Writes what `npm pack` ships: dist/eva-ws-client.js, a plain copy of the module.
// The module has one source, service/static/eva-ws-client.js, which the service serves; the
// eva-ws-client.js beside this file is a symbolic link to it, and npm leaves symbolic links
// out of a package. dist/ is build output and is not committed.
import { copyFileSync, mkdirSync, realpathSync } from 'node:fs';

const here = new URL('.', import.meta.url);
mkdirSync(new URL('dist/', here), { recursive: true });
copyFileSync(realpathSync(new URL('eva-ws-client.js', here)), new URL('dist/eva-ws-client.js', here));
