"""Ingress gateway: routes from Gateway + VirtualService, HTTP/HTTPS/TCP listeners."""
