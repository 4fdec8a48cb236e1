from trace_transfer.cli import main

if __name__ == "__main__":
    main()
