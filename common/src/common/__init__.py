"""The record service's shared package; its layers are described in the README (Layout)."""
