"""The mitmproxy side: the addons on the request path and what they share."""
