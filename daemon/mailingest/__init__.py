"""mailingest: POP3 mail ingestion for a CRM."""

__version__ = "0.1.0"

__all__ = ["__version__"]
