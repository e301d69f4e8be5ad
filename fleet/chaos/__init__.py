"""`scripts/chaos`: a seeded fault schedule over a real cluster, with resuming clients and a delivery checker.

`checker` judges delivery logs against the publishers' ledger and knows nothing of processes;
`topology` starts the parts, `faults` breaks them, `traffic` publishes and listens, `run` ties
them together and prints the table.
"""
