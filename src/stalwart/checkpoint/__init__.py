"""stalwart.checkpoint.format."""
