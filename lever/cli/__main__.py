from lever.cli import main

main()
