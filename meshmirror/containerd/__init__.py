"""containerd integration: the gRPC client and the Store over containerd's images and content."""
