"""System mode: the virtual i686 PC's CPU architecture (segmentation, paging, interrupts)."""
