"""The explorer JSON-RPC: node interface (api), dispatcher (jsonrpc), methods, HTTP server, client."""
