"""stalwart.health.monitor."""
