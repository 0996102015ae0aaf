"""Pure tensor functions shared by methods (nothing here knows about timm)."""
