"""One module per op family: reference implementation, host checks and the public function.

Kept import-free so modules can be loaded one at a time (tests load host launchers directly).
"""
