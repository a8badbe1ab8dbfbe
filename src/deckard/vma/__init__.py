"""The guest agent (QVD's VMA): runs inside every desktop; standard library only, imports nothing from deckard."""
