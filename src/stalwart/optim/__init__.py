"""stalwart.optim.build."""
