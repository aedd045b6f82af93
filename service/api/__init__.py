"""The /api/v1 blueprints, one per resource."""
