//! virtio-net (placeholder until written).
