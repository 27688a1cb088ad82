//! gRPC API of vmblkd.
