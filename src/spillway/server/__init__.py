"""The HTTP server: aiohttp.web app, middleware, routes, and the Gateway state."""
