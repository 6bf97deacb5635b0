"""Thin ComfyUI layer: node declarations, model folders, and the bridge to ComfyUI's model management."""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
