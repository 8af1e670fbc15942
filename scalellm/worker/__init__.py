"""What the prefill and decode services share: config, proto conversion, metrics, the gRPC server
scaffold. Only the worker services join the engine to the transfer layer."""
