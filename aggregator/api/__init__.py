"""The aggregator's wire contract, published to phones like a client SDK.

`schemas.py` holds every request and response body, `client.py` the HTTP client, and
`protocol.py` the interface (`Aggregator`) that the HTTP client and the in-process
client (`aggregator/inprocess.py`) both satisfy. Phones, the fleet and the web demo
import this package and nothing else of the server; it imports nothing else of the
server (import-linter checks both, see pyproject.toml).
"""
