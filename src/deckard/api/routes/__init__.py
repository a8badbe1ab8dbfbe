"""One module per resource; each exposes ``router`` and the request/response models of its resource."""
