"""The PyTorch side: the network, the data sets and training. Needs the `train` extra (torch)."""
