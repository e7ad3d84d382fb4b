"""Reading a backbone: the torch.fx graph and its stages, the forward-hooks fallback, MAC counting."""
