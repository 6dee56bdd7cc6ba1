"""What the payments tables say to their readers (the weekly close and the ledger audit)."""
from __future__ import annotations


# The highest far_payment_items sequence number handed out so far (0 before any): a batch line covers items
# up to its through_seq, which never passes this.
ITEMS_HIGH_WATER = "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM far_payment_items_seq_seq"
