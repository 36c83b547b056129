"""JSON Schemas shipped with nearfar (package data): ``card.schema.json`` for card.json."""
