"""Level 4: what calibration data says about a model — each layer's input statistics (collected by
forward hooks, one block at a time on cached inputs), the calibration cache reused across calls, and
each layer's sensitivity (Fisher weights) at the model's output."""
