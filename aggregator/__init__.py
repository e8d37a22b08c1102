"""The aggregation service: rounds, Federated Averaging and model storage behind a FastAPI app."""
