"""Route handlers of the ingress, one module per resource."""
