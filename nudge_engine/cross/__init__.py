"""The text path's pieces (NUDGING.md section 7): word pieces, span text and the request; its round is nudge_engine/pairing/text.py."""
