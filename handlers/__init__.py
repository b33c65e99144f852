"""Custom TorchServe handlers. Each .mar carries this package and the models package."""
