"""placeholder"""
import argparse


def main(args: argparse.Namespace) -> int:
    return 0
