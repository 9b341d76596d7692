"""stalwart.eval."""
