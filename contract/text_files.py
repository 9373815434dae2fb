"""What every reader of a user's text file says about a UTF-8 byte-order mark.

TOML forbids a byte-order mark (BOM) and Flower's own readers refuse one, so the project's
readers of TOML and key files (policy, plausibility ranges, ``node.pub``, an app's
``pyproject.toml``) name it instead of stripping it, with one fix worded once here.
"""

from __future__ import annotations

#: The three bytes a "UTF-8 with BOM" editor writes at the start of a file.
UTF8_BOM = b"\xef\xbb\xbf"
#: The fix every BOM refusal gives.
BOM_FIX = "save it as UTF-8 without BOM (in Notepad: encoding 'UTF-8', not 'UTF-8 with BOM')"
