"""ComfyUI entry point of the Lumina-mGPT 2.0 pack: node mappings and the web extension folder."""
if __package__:  # imported as a package: how ComfyUI loads custom_nodes/<pack>/__init__.py
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a bare file (pytest's setup of a checkout whose folder name holds a dot, such as
    # a mktemp clone): relative imports are impossible there and there is nothing to register.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
