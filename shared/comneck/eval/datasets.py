"""(being written: see comneck.eval)"""
