"""The pack's ComfyUI nodes: thin adapters over lumina_core (filled in as nodes land)."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
