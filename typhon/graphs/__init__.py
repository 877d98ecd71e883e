"""LangGraph graphs (the Development crew, checkpointing).

Importing this package imports no langgraph.
"""
