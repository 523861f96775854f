"""Node identity and handshake, stream multiplexing (sans-IO frames), peer paths."""
