"""What an output is: the contract (base), the .tar.xz, the folder tree."""
