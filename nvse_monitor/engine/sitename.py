"""How a code address is shown: `module!function+0xoff` where a symbol is known, else
`module+0xoff` (the offset form), `0x...` outside every module."""

from __future__ import annotations


def site_label(module: str, offset: int | None, function: str | None = None) -> str:
    """module: the module's name ("unknown" or "" outside every module); offset: address - base
    (the absolute address when no module); function: "name" or "name+0xoff" from the symbols."""
    if function:
        return f"{module}!{function}" if module and module != "unknown" else function
    if offset is None:
        return module
    if not module or module == "unknown":
        return f"0x{offset:x}"
    return f"{module}+0x{offset:x}"
