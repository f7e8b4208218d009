"""The cloud side: the target model, verifier sessions, continuous batching and the gRPC server."""
