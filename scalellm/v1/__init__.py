"""Generated gRPC/protobuf modules for protos/scalellm/v1 (see tools/gen_protos.py; never edit by hand)."""
