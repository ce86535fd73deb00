"""cluster: an event-sourced master/worker runtime for inference clusters."""
