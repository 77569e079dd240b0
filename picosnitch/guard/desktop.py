"""Guard prompts as desktop notifications with actions (Allow once / Allow always / Deny)."""
