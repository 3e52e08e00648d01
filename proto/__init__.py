"""gRPC wire definitions. `python -m proto.generate` regenerates the modules from the .proto."""
