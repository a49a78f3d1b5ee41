"""The API's routers, one per concern: search, cells, tiles, viewer, health."""
