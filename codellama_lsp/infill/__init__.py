"""Pure text and token logic of the completion pipeline: no torch, no I/O.

- `prompt`: the infilling (PSM/SPM) and plain-completion token layouts.
- `chat`: the Instruct dialog layouts (Llama 2 `[INST]` and 70B `<step>` turns).
- `window`: which part of a document goes into a prompt within a token budget.
- `mode`: single-line or block completion, and when a streamed answer is complete.
- `postprocess`: the ordered, named rules that turn a raw middle into an edit.
- `edits`: LSP positions, offsets and incremental document changes.

Import the submodules you need; importing this package imports nothing heavy.
"""
