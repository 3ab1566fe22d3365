"""What runs on the Ray workers: the train loop, the model, the data stream, the state."""
