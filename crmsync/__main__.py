from crmsync import main

main()
