"""The language server's LSP glue (pygls 2): handlers, error mapping, transports."""
