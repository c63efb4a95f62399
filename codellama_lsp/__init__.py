"""codellama-lsp: Code Llama fill-in-the-middle completions and code actions over LSP."""

__version__ = "0.1.0"
